"""The packed LZ4 sequence cache: build, grow, fill, validate and read it (DESIGN §2).

Import-light modules (safe for the TUI): metadata, registry, sources. The rest import numpy/lz4, and the
builder imports tokenizers/datasets only when it runs.
"""
