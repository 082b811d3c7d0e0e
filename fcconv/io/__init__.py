"""Files: every checkpoint format fcconv reads and writes, and safe, atomic output.

| module | its one job |
|---|---|
| :mod:`~fcconv.io.safetensors` | the safetensors header: parse, validate, encode; read tensors |
| :mod:`~fcconv.io.streaming` | the streamed safetensors rewrite, in bounded memory |
| :mod:`~fcconv.io.sharded` | sharded checkpoints: the index and its shards |
| :mod:`~fcconv.io.checkpoint` | whole-file load and save: torch pickles (safely), safetensors |
| :mod:`~fcconv.io.sources` | one view of any input: headers or loaded tensors |
| :mod:`~fcconv.io.provenance` | fcconv's record of a conversion in the file's metadata |
| :mod:`~fcconv.io.atomic` | which outputs may be written, and writing them atomically |
"""
