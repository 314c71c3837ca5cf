"""Wire schema version carried by every message.

Bump it (and call it out in CHANGELOG.md) whenever a message's shape or a hashing rule changes.
"""

from typing import Final

SCHEMA_VERSION: Final = 1
