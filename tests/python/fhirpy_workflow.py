"""Drives the FHIR server with the Python `fhirpy` client (beda-software/fhir-py) the way an
integration script would: create, search by name and identifier, page through results, update
with the version it read, and delete.

Usage: fhirpy_workflow.py FHIR_BASE_URL ACCESS_TOKEN
"""

import sys

from fhirpy import SyncFHIRClient


def main() -> None:
    base, token = sys.argv[1:3]
    client = SyncFHIRClient(base, authorization=f"Bearer {token}")
    for index in range(25):
        client.resource(
            "Patient",
            name=[{"family": "Pythonista", "given": [f"Number{index}"]}],
            identifier=[{"system": "urn:fhirpy", "value": f"py-{index}"}],
            birthDate=f"19{50 + index}-01-01",
        ).save()
    found = client.resources("Patient").search(family="python").limit(10).fetch_all()
    assert len(found) == 25, len(found)
    assert len({patient.id for patient in found}) == 25
    older = client.resources("Patient").search(family="pythonista", birthdate__lt="1960").fetch_all()
    assert len(older) == 10, len(older)
    patient = client.resources("Patient").search(identifier="urn:fhirpy|py-7").get()
    assert patient["name"][0]["given"] == ["Number7"]
    patient["active"] = True
    patient.save()
    again = client.reference("Patient", patient.id).to_resource()
    assert again["active"] is True
    assert again["meta"]["versionId"] == "2"
    again.delete()
    remaining = client.resources("Patient").search(family="pythonista").count()
    assert remaining == 24, remaining
    print("ok: 25 patients paged, updated v2, deleted")


if __name__ == "__main__":
    main()
