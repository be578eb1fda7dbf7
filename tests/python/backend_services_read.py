"""SMART Backend Services with the Python `fhirclient` (smart-on-fhir/client-py): discover the
token endpoint from the CapabilityStatement, authenticate with a signed ES384 client assertion,
then read a Patient. Prints the patient's family name.

Usage: backend_services_read.py BASE_URL CLIENT_ID PRIVATE_KEY_PEM KEY_ID PATIENT_ID
"""

import sys
import time
import uuid

import jwt
from fhirclient import client
from fhirclient.models.patient import Patient


def main() -> None:
    base, client_id, key_file, key_id, patient_id = sys.argv[1:6]
    token_url = f"{base}/auth/token"
    with open(key_file, encoding="utf-8") as key:
        assertion = jwt.encode(
            {
                "iss": client_id,
                "sub": client_id,
                "aud": token_url,
                "exp": int(time.time()) + 240,
                "jti": str(uuid.uuid4()),
            },
            key.read(),
            algorithm="ES384",
            headers={"kid": key_id},
        )
    smart = client.FHIRClient(
        settings={
            "app_id": client_id,
            "api_base": f"{base}/fhir/",
            "jwt_token": assertion,
            "scope": "system/*.rs",
        },
        save_func=lambda state: None,
    )
    smart.wants_patient = False
    smart.prepare()
    smart.authorize()
    patient = Patient.read(patient_id, smart.server)
    print(patient.name[0].family)


if __name__ == "__main__":
    main()
