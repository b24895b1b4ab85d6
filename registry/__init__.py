"""OCI distribution client, signatures, attestations, trust policy and audit log."""
