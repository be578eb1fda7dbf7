"""Real DICOM peers for the end-to-end tests: pynetdicom (C-ECHO, C-STORE, C-FIND),
dicomweb-client (STOW-RS, QIDO-RS, WADO-RS) and an independent pydicom check of
de-identified output against Table E.1-1. Each subcommand prints one JSON document."""
import argparse
import json
import sys


def pynetdicom_store(args):
    import pydicom
    from pynetdicom import AE, StoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.aet)
    datasets = []
    for path in args.files:
        dataset = pydicom.dcmread(path)
        datasets.append((path, dataset))
        ae.add_requested_context(dataset.SOPClassUID, [str(dataset.file_meta.TransferSyntaxUID)])
    ae.add_requested_context(Verification)
    association = ae.associate(args.host, args.port, ae_title=args.called)
    if not association.is_established:
        print(json.dumps({"established": False}))
        return
    results = []
    for path, dataset in datasets:
        status = association.send_c_store(dataset)
        results.append({"file": path, "status": int(status.Status) if status else None,
                        "comment": str(status.get("ErrorComment", "")) if status else ""})
    echo = association.send_c_echo()
    # What pynetdicom saw of the association once the echo returned (an unanswered echo leaves
    # it established; an abort or a closed connection does not).
    state_after_echo = {"established": association.is_established, "aborted": association.is_aborted}
    association.release()
    print(json.dumps({"established": True, "stores": results, "echo_after": int(echo.Status) if echo else None,
                      "association_after_echo": state_after_echo}))


def pynetdicom_find(args):
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                      StudyRootQueryRetrieveInformationModelFind)

    model = (PatientRootQueryRetrieveInformationModelFind if args.level == "PATIENT"
             else StudyRootQueryRetrieveInformationModelFind)
    ae = AE(ae_title=args.aet)
    ae.add_requested_context(model)
    association = ae.associate(args.host, args.port, ae_title=args.called)
    if not association.is_established:
        print(json.dumps({"established": False}))
        return
    query = Dataset()
    query.QueryRetrieveLevel = args.level
    for pair in args.keys:
        keyword, _, value = pair.partition("=")
        setattr(query, keyword, value)
    matches = []
    final = None
    for status, identifier in association.send_c_find(query, model):
        if status is None:
            break
        if status.Status in (0xFF00, 0xFF01) and identifier is not None:
            matches.append({element.keyword: str(element.value) for element in identifier if element.keyword})
        else:
            final = int(status.Status)
    association.release()
    print(json.dumps({"established": True, "matches": matches, "final": final}))


def dicomweb(args):
    import hashlib
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {args.token}"
    client = DICOMwebClient(url=args.base, session=session)
    datasets = [pydicom.dcmread(path) for path in args.files]
    stored = client.store_instances(datasets=datasets)
    referenced = [str(item.ReferencedSOPInstanceUID) for item in stored.get("ReferencedSOPSequence", [])]
    report = {"stored": referenced, "failed": len(stored.get("FailedSOPSequence", [])), "round_trips": []}
    for path, dataset in zip(args.files, datasets):
        studies = client.search_for_studies(search_filters={"StudyInstanceUID": dataset.StudyInstanceUID})
        instances = client.search_for_instances(
            study_instance_uid=dataset.StudyInstanceUID,
            series_instance_uid=dataset.SeriesInstanceUID,
            search_filters={"SOPInstanceUID": dataset.SOPInstanceUID})
        retrieved = client.retrieve_instance(
            study_instance_uid=dataset.StudyInstanceUID,
            series_instance_uid=dataset.SeriesInstanceUID,
            sop_instance_uid=dataset.SOPInstanceUID,
            media_types=(("application/dicom", "*"),))
        metadata = client.retrieve_instance_metadata(
            study_instance_uid=dataset.StudyInstanceUID,
            series_instance_uid=dataset.SeriesInstanceUID,
            sop_instance_uid=dataset.SOPInstanceUID)
        report["round_trips"].append({
            "file": path,
            "studies_found": len(studies),
            "instances_found": len(instances),
            "same_sop_instance": str(retrieved.SOPInstanceUID) == str(dataset.SOPInstanceUID),
            "metadata_sop_instance": metadata.get("00080018", {}).get("Value", [None])[0],
        })
    print(json.dumps(report))


def native_frame(dataset, index):
    """Frame `index` (0-based) of native pixel data, as WADO-RS serves it: little endian."""
    import numpy

    bits = int(dataset.BitsAllocated)
    length = int(dataset.Rows) * int(dataset.Columns) * int(dataset.SamplesPerPixel) * bits // 8
    raw = dataset.PixelData[index * length:(index + 1) * length]
    if not dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2" or bits == 8:
        return bytes(raw)
    kind = {16: "u2", 32: "u4"}[bits]
    return numpy.frombuffer(raw, ">" + kind).astype("<" + kind).tobytes()


def expected_frame(dataset):
    """Frame 1 as stored, found with pydicom's own encapsulation code."""
    from pydicom.encaps import generate_frames

    if not dataset.file_meta.TransferSyntaxUID.is_compressed:
        return native_frame(dataset, 0)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    return next(generate_frames(dataset.PixelData, number_of_frames=frames))


def expected_rendering(dataset):
    """A native grayscale frame rendered independently: rescale, then the instance's linear
    window (PS3.3 C.11.2.1.2.1), or the frame's range when it states none."""
    import numpy

    values = dataset.pixel_array.astype(numpy.float64)
    values = values * float(getattr(dataset, "RescaleSlope", 1)) + float(getattr(dataset, "RescaleIntercept", 0))
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        center = dataset.WindowCenter[0] if dataset["WindowCenter"].VM > 1 else dataset.WindowCenter
        width = dataset.WindowWidth[0] if dataset["WindowWidth"].VM > 1 else dataset.WindowWidth
        center, width = float(center), float(width)
        fraction = (values - (center - 0.5)) / max(width - 1, 1) + 0.5
    else:
        low, high = values.min(), values.max()
        fraction = (values - (low + high) / 2) / max(high - low, 1) + 0.5
    return numpy.round(numpy.clip(fraction, 0, 1) * 255)


def frames_and_renders(args):
    """Stores each file with dicomweb-client, then retrieves its first frame (compared with
    pydicom's frame) and its rendered PNG and JPEG (decoded with Pillow; native grayscale
    renderings compared with an independent rendering)."""
    import hashlib
    import io

    import numpy
    import pydicom
    import requests
    from PIL import Image
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {args.token}"
    client = DICOMwebClient(url=args.base, session=session)
    media_types = {
        "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
        "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
        "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
        "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
        "1.2.840.10008.1.2.5": "image/dicom-rle",
    }
    report = []
    renderings = {}
    for path in args.files:
        dataset = pydicom.dcmread(path)
        for missing in ("StudyInstanceUID", "SeriesInstanceUID"):
            if missing not in dataset:  # a few codec test files carry no study or series
                setattr(dataset, missing, pydicom.uid.generate_uid())
        try:
            client.store_instances(datasets=[dataset])
        except requests.HTTPError as error:
            raise SystemExit(f"{path}: {error.response.status_code} {error.response.text}")
        uids = dict(study_instance_uid=dataset.StudyInstanceUID,
                    series_instance_uid=dataset.SeriesInstanceUID,
                    sop_instance_uid=dataset.SOPInstanceUID)
        syntax = str(dataset.file_meta.TransferSyntaxUID)
        media_type = media_types.get(syntax)
        accept = (media_type, syntax) if media_type else ("application/octet-stream", "1.2.840.10008.1.2.1")
        frame = client.retrieve_instance_frames(frame_numbers=[1], media_types=(accept,), **uids)[0]
        entry = {"file": path.split("/")[-1],
                 "frame_matches": hashlib.sha256(frame).digest() == hashlib.sha256(expected_frame(dataset)).digest()}
        try:
            png = client.retrieve_instance_rendered(media_types=("image/png",), **uids)
            jpeg = client.retrieve_instance_rendered(media_types=("image/jpeg",), params={"quality": 80}, **uids)
        except requests.HTTPError as error:
            entry["render_status"] = error.response.status_code
            entry["render_detail"] = error.response.json().get("detail", "")
            report.append(entry)
            continue
        image = numpy.asarray(Image.open(io.BytesIO(png)))
        entry["render_status"] = 200
        entry["png_shape"] = list(image.shape)
        entry["jpeg_format"] = Image.open(io.BytesIO(jpeg)).format
        entry["rows_columns"] = [int(dataset.Rows), int(dataset.Columns)]
        entry["distinct_values"] = int(len(numpy.unique(image)))
        if not dataset.file_meta.TransferSyntaxUID.is_compressed \
                and str(dataset.PhotometricInterpretation).startswith("MONOCHROME") \
                and dataset.BitsAllocated in (8, 16) and int(getattr(dataset, "NumberOfFrames", 1) or 1) == 1:
            entry["max_difference_from_independent"] = float(numpy.abs(image - expected_rendering(dataset)).max())
        renderings.setdefault(str(dataset.SOPInstanceUID), []).append((entry["file"], image))
        report.append(entry)
    same = {}
    for uid, images in renderings.items():
        reference_name, reference = images[0]
        for name, image in images[1:]:
            same[name] = {"reference": reference_name,
                          "max_difference": float(numpy.abs(image.astype(int) - reference.astype(int)).max())
                          if image.shape == reference.shape else None}
    print(json.dumps({"files": report, "same_image_as": same}))


def check_deidentified(args):
    """Every attribute of Table E.1-1 present in the input got its action in the output."""
    import pydicom
    from pydicom.tag import Tag

    table = json.load(open(args.table))
    rows = [row for row in table["rows"] if "x" not in row["tag"]]
    source = pydicom.dcmread(args.input)
    result = pydicom.dcmread(args.output)
    problems = []
    checked = 0

    def walk(original, deidentified, path):
        nonlocal checked
        for row in rows:
            tag = Tag(int(row["tag"], 16))
            if tag not in original:
                continue
            element = original[tag]
            if element.VR == "SQ" and row["action"] in ("K",):
                continue
            checked += 1
            present = tag in deidentified
            out = deidentified[tag] if present else None
            empty = (out is None) or out.value in (None, "", b"", []) or (out.VR == "SQ" and len(out.value) == 0)
            action = row["action"]
            name = f"{path}{row['keyword'] or row['tag']}"
            original_value = element.value
            changed = (out is None) or (str(out.value) != str(original_value)) or original_value in (None, "", b"")
            if action == "X" and present:
                problems.append(f"{name}: X but present")
            elif action == "Z" and (not present or not empty):
                problems.append(f"{name}: Z but {'absent' if not present else 'not empty'}")
            elif action in ("D", "Z/D", "X/D", "X/Z/D", "X/Z") and present and element.VR != "SQ" and not changed:
                problems.append(f"{name}: {action} but unchanged")
            elif action in ("U", "X/Z/U*") and present and element.VR == "UI" and not empty:
                if str(out.value) == str(original_value):
                    problems.append(f"{name}: U but the UID is unchanged")
        for element in original:
            if element.VR == "SQ" and element.tag in deidentified and deidentified[element.tag].VR == "SQ":
                for index, (item, out_item) in enumerate(zip(element.value, deidentified[element.tag].value)):
                    walk(item, out_item, f"{path}{element.keyword}[{index}].")

    walk(source, result, "")
    private_left = [str(element.tag) for element in result if element.tag.is_private]
    if private_left:
        problems.append(f"private attributes remain: {private_left[:5]}")
    if getattr(result, "PatientIdentityRemoved", "") != "YES":
        problems.append("PatientIdentityRemoved is not YES")
    if "DeidentificationMethodCodeSequence" not in result:
        problems.append("no DeidentificationMethodCodeSequence")
    print(json.dumps({"checked": checked, "problems": problems,
                      "study_uid": str(getattr(result, "StudyInstanceUID", "")),
                      "series_uid": str(getattr(result, "SeriesInstanceUID", ""))}))


def main():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    store = commands.add_parser("store")
    find = commands.add_parser("find")
    for command in (store, find):
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, required=True)
        command.add_argument("--aet", required=True)
        command.add_argument("--called", required=True)
    store.add_argument("files", nargs="+")
    find.add_argument("--level", default="STUDY")
    find.add_argument("keys", nargs="*")
    web = commands.add_parser("dicomweb")
    web.add_argument("--base", required=True)
    web.add_argument("--token", required=True)
    web.add_argument("files", nargs="+")
    renders = commands.add_parser("frames-and-renders")
    renders.add_argument("--base", required=True)
    renders.add_argument("--token", required=True)
    renders.add_argument("files", nargs="+")
    check = commands.add_parser("check-deid")
    check.add_argument("--table", required=True)
    check.add_argument("input")
    check.add_argument("output")
    args = parser.parse_args()
    {"store": pynetdicom_store, "find": pynetdicom_find, "dicomweb": dicomweb,
     "frames-and-renders": frames_and_renders, "check-deid": check_deidentified}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
