#!/usr/bin/env python3
"""Generates dicom/data/confidentiality-profile.json: DICOM PS3.15 Annex E Table E.1-1 (the Basic
Application Level Confidentiality Profile and its options) as data.

No registry ships the standard's DocBook table itself, so the table is assembled from two
packages that extract it from the standard's own HTML rendering (which NEMA generates from the
DocBook), both pinned by version and sha256:

* dicom-anonymizer 2.1.0 (PyPI, BSD-3-Clause): `dicomfields_2026c.py`, the Basic Profile action
  of every attribute of the 2026c edition, grouped by action code.
* dicom-standard 0.1.0 (PyPI, MIT, innolitics): `confidentiality_profile_attributes.json`, the
  whole table of an earlier edition with the option columns (Retain Safe Private, Retain UIDs,
  Retain Device Identity, Retain Institution Identity, Retain Patient Characteristics, Retain
  Longitudinal Full Dates, Retain Longitudinal Modified Dates, Clean Descriptors, Clean Structured
  Content, Clean Graphics).

The Basic Profile action comes from the newer edition; an attribute's option cells come from
the table that has them (attributes added to the standard since have no option cells, so the
options leave them to the Basic Profile: the conservative reading). Names, keywords and VRs come
from pydicom's data dictionary (names of attributes newer than it from dicom-anonymizer).

Run with the project's venv (it needs pydicom): `.venv/bin/python scripts/generate-deidentification-profile.py`
"""
import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(HERE, "..", "dicom", "data", "confidentiality-profile.json")

ANONYMIZER = ("dicom-anonymizer", "2.1.0", "dicom_anonymizer-2.1.0-py3-none-any.whl",
              "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py")
STANDARD = ("dicom-standard", "0.1.0", "dicom_standard-0.1.0-py3-none-any.whl",
            "dicom_standard-0.1.0.data/data/standard/confidentiality_profile_attributes.json")
EXPECTED_SHA256 = {
    "dicom_standard-0.1.0-py3-none-any.whl": "648aad3e57229c8891c7970533638584237b2347001cfcc78f84d7d19e8bdeac",
}

# dicom-anonymizer's list names and the Table E.1-1 action codes they stand for.
ACTION_LISTS = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}

OPTION_COLUMNS = {
    "rtnSafePrivOpt": "retain_safe_private",
    "rtnUIDsOpt": "retain_uids",
    "rtnDevIdOpt": "retain_device_identity",
    "rtnInstIdOpt": "retain_institution_identity",
    "rtnPatCharsOpt": "retain_patient_characteristics",
    "rtnLongFullDatesOpt": "retain_longitudinal_full_dates",
    "rtnLongModifDatesOpt": "retain_longitudinal_modified_dates",
    "cleanDescOpt": "clean_descriptors",
    "cleanStructContOpt": "clean_structured_content",
    "cleanGraphOpt": "clean_graphics",
}


def wheel(package):
    name, version, filename, _ = package
    folder = tempfile.mkdtemp()
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", "-d", folder, f"{name}=={version}"], check=True)
    path = os.path.join(folder, filename)
    data = open(path, "rb").read()
    digest = hashlib.sha256(data).hexdigest()
    expected = EXPECTED_SHA256.get(filename)
    if expected and digest != expected:
        sys.exit(f"{filename}: sha256 {digest} is not the pinned {expected}")
    return filename, digest, zipfile.ZipFile(io.BytesIO(data))


def tag_text(group, element, group_mask=0xFFFF, element_mask=0xFFFF):
    """`0010,0010` as `00100010`; masked nibbles as `x` (`50xxxxxx`)."""
    text = ""
    for value, mask in ((group, group_mask), (element, element_mask)):
        for shift in (12, 8, 4, 0):
            nibble_mask = (mask >> shift) & 0xF
            text += "%X" % ((value >> shift) & 0xF) if nibble_mask == 0xF else "x"
    return text


def basic_profile(source):
    tree = ast.parse(source)
    rows = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.List):
            continue
        name = node.targets[0].id
        action = ACTION_LISTS.get(name)
        if action is None:
            continue
        for item in node.value.elts:
            numbers = [ast.literal_eval(part) for part in item.elts]
            tag = tag_text(*numbers)
            if tag in rows and rows[tag] != action:
                sys.exit(f"{tag} has two actions")
            rows[tag] = action
    return rows


def names_in_comments(source):
    """The attribute names dicom-anonymizer writes beside each tag (`(0x0010, 0x0010),  # Name`)."""
    names = {}
    pattern = re.compile(r"\(0x([0-9A-Fa-f]{4}), 0x([0-9A-Fa-f]{4})(?:, 0x([0-9A-Fa-f]{4}), 0x([0-9A-Fa-f]{4}))?\),\s*#\s*(.+)")
    for line in source.splitlines():
        found = pattern.search(line)
        if found:
            group, element, group_mask, element_mask, name = found.groups()
            masks = (int(group_mask, 16), int(element_mask, 16)) if group_mask else (0xFFFF, 0xFFFF)
            names[tag_text(int(group, 16), int(element, 16), *masks)] = name.strip()
    return names


def options_by_tag(table):
    options = {}
    for row in table:
        tag = row["tag"]
        if not tag.startswith("(") or "WHERE" in tag:
            continue
        key = tag.strip("()").replace(",", "").replace("X", "x")
        cells = {OPTION_COLUMNS[column]: value for column, value in row.items() if column in OPTION_COLUMNS}
        options[key] = cells
    return options


def main():
    import pydicom
    from pydicom.datadict import DicomDictionary, RepeatersDictionary

    anonymizer_file, anonymizer_digest, anonymizer = wheel(ANONYMIZER)
    standard_file, standard_digest, standard = wheel(STANDARD)
    anonymizer_source = anonymizer.read(ANONYMIZER[3]).decode()
    actions = basic_profile(anonymizer_source)
    commented_names = names_in_comments(anonymizer_source)
    table = json.loads(standard.read(STANDARD[3]))
    options = options_by_tag(table)
    private_row = next(row for row in table if "WHERE" in row["tag"])

    rows = []
    for tag, action in sorted(actions.items()):
        entry = None
        if "x" not in tag:
            entry = DicomDictionary.get(int(tag, 16))
        else:
            entry = RepeatersDictionary.get(tag.replace("x", "X").replace("XX", "xx"))
            entry = entry or RepeatersDictionary.get(tag.upper().replace("X", "x"))
        vr, _, name, retired, keyword = entry if entry else ("", "", "", "", "")
        rows.append({
            "tag": tag,
            "keyword": keyword,
            "name": name or commented_names.get(tag, ""),
            "vr": vr,
            "retired": retired == "Retired",
            "action": action,
            "options": options.get(tag, {}),
        })
    document = {
        "description": "DICOM PS3.15 Annex E Table E.1-1: Basic Application Level Confidentiality Profile attributes, with the option columns. Generated by scripts/generate-deidentification-profile.py; do not edit.",
        "edition": "2026c (Basic Profile actions); options from the dicom-standard 0.1.0 extraction",
        "sources": [
            {"package": f"{ANONYMIZER[0]}=={ANONYMIZER[1]}", "wheel": anonymizer_file, "sha256": anonymizer_digest,
             "file": ANONYMIZER[3], "license": "BSD-3-Clause", "gives": "Basic Profile action codes"},
            {"package": f"{STANDARD[0]}=={STANDARD[1]}", "wheel": standard_file, "sha256": standard_digest,
             "file": STANDARD[3], "license": "MIT", "gives": "option columns"},
            {"package": f"pydicom=={pydicom.__version__}", "gives": "names, keywords, VRs, retired flags"},
        ],
        "private_attributes": {
            "action": private_row["basicProfile"],
            "options": {OPTION_COLUMNS[c]: v for c, v in private_row.items() if c in OPTION_COLUMNS},
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
    with open(OUTPUT, "w") as out:
        json.dump(document, out, indent=1)
        out.write("\n")
    print(f"{len(rows)} attributes written to {os.path.relpath(OUTPUT)}")


if __name__ == "__main__":
    main()
