-- The identifying DICOM attributes the blind index keeps (patient name and ID, birth date,
-- accession number, referring physician, study ID, issuer) are patient or study level: every
-- instance of a study carries the same values. Their tokens are now owned by the study
-- (resource_type 'DicomStudy', resource_id = study key) instead of being repeated for each
-- instance, which cut the pages a C-STORE dirties by about half. Existing tokens move over.
INSERT INTO search_tokens (resource_type, resource_id, param, token)
SELECT DISTINCT 'DicomStudy', d.study_key, t.param, t.token
FROM search_tokens t
JOIN dicom_instances d ON d.instance_key = t.resource_id
WHERE t.resource_type = 'DicomInstance';
DELETE FROM search_tokens WHERE resource_type = 'DicomInstance';
