-- Refuses new content for a crypto-shredded patient inside the writing transaction itself.
-- A process that still holds the patient's key in memory (another replica, or one that loaded the
-- key before `glastonbury patient shred` ran elsewhere) can then never encrypt new data under a
-- destroyed identity. Tombstones (deleted = 1) carry no content and are still allowed.
CREATE FUNCTION refuse_records_of_shredded_patients() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.deleted = 0 AND EXISTS (
        SELECT 1 FROM patient_keys
        WHERE patient_ref = NEW.patient_ref AND shredded_at IS NOT NULL
    ) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = 'glastonbury: the patient was crypto-shredded';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER refuse_records_of_shredded_patients
BEFORE INSERT ON records
FOR EACH ROW EXECUTE FUNCTION refuse_records_of_shredded_patients();
