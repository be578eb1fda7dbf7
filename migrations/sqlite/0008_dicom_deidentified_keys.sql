-- The de-identified view of DICOM data names studies, series and instances by remapped UIDs
-- (PS3.15: 2.25 UIDs from a keyed hash under the appliance's de-identification key). These
-- columns hold the keyed hashes of those remapped UIDs, so a researcher's WADO-RS or QIDO-RS
-- request for a remapped UID finds its instance without the mapping ever being reversible.
-- Rows stored before this migration are filled in by the appliance at start.
ALTER TABLE dicom_instances ADD COLUMN deid_study_key TEXT;
ALTER TABLE dicom_instances ADD COLUMN deid_series_key TEXT;
ALTER TABLE dicom_instances ADD COLUMN deid_instance_key TEXT;
CREATE INDEX dicom_instances_by_deid_study ON dicom_instances (deid_study_key, deid_series_key);
CREATE INDEX dicom_instances_by_deid_instance ON dicom_instances (deid_instance_key);
