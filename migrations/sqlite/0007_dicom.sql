-- DICOM instances. Each is a record of type 'DicomInstance' (its Part 10 file encrypted to the
-- patient's key, in the blob store when large); this table is its QIDO-RS / C-FIND index. UIDs
-- appear only as keyed hashes, the header (DICOM JSON, no bulk data) is encrypted like the file,
-- and patient-identifying attributes are matched through search_tokens rows.
CREATE TABLE dicom_instances (
    instance_key TEXT PRIMARY KEY,
    series_key TEXT NOT NULL,
    study_key TEXT NOT NULL,
    patient_ref TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    modality TEXT,
    study_date INTEGER,
    series_number INTEGER,
    instance_number INTEGER,
    header BLOB NOT NULL,
    stored_at INTEGER NOT NULL
);
CREATE INDEX dicom_instances_by_study ON dicom_instances (study_key, series_key);
CREATE INDEX dicom_instances_by_series ON dicom_instances (series_key, instance_number);
CREATE INDEX dicom_instances_by_date ON dicom_instances (study_date, study_key);
CREATE INDEX dicom_instances_by_patient ON dicom_instances (patient_ref);
-- DICOM peers are API clients with an AE title: a DIMSE association is allowed only for a
-- registered calling AE title, and acts with that client's role and scopes.
ALTER TABLE clients ADD COLUMN ae_title TEXT;
CREATE UNIQUE INDEX clients_by_ae_title ON clients (ae_title);
