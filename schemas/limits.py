"""Size limits shared by producers, workers and settlement.

Every limit is enforced when a message is decoded, so a hostile producer cannot make a worker
allocate without bound. Kafka's default `message.max.bytes` is ~1 MiB; we stay under it.
"""

from typing import Final

MAX_MESSAGE_BYTES: Final = 1_000_000
MAX_ID_CHARS: Final = 128
MAX_CHAT_MESSAGES: Final = 256
MAX_PROMPT_CHARS: Final = 200_000
MAX_STOP_SEQUENCES: Final = 4
MAX_STOP_CHARS: Final = 64
MAX_NEW_TOKENS: Final = 4096
MAX_TENSORS: Final = 32
MAX_TENSOR_ELEMENTS: Final = 65_536
MAX_TENSOR_RANK: Final = 8
MAX_STRING_ELEMENT_CHARS: Final = 4096
MAX_ERROR_MESSAGE_CHARS: Final = 512
MAX_JSON_DEPTH: Final = 32
MAX_TOOLS: Final = 64
MAX_TOOL_CALLS: Final = 64
MAX_TOOL_SCHEMA_CHARS: Final = 65_536
MAX_TOOL_ARGUMENTS_CHARS: Final = 100_000
