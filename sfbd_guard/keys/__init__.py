"""The data owner's keys and what is derived from them.

- `secret`: the owner's secret and its HKDF subkeys (noise, digests, release register);
- `digests`: keyed pixel digests and the digest key file a verifier may hold;
- `signing`: Ed25519 signatures of cards and ledger heads;
- `owner`: the owner's own folder (key, release register, lineage), apart from everything handed to others.
"""
