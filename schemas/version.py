"""Wire schema version carried by every message.

Bump it (and call it out in CHANGELOG.md) whenever a message's shape or a hashing rule changes.
Version 2: requests bind payer signatures and settlement modes, envelopes commit to them and are
also signed with the node's chain key, errors and stream chunks are signed, replies to sealed
requests are sealed whole, registrations carry a sequence number, admissions replace
registry-topic revocations.
"""

from typing import Final, Literal

__all__ = ["SCHEMA_VERSION", "SchemaVersion"]

SCHEMA_VERSION: Final = 2
SchemaVersion = Literal[2]
