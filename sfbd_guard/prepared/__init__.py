"""The prepared directory: what a data owner hands to a training team.

- `layout`: its file and folder names and the manifest's columns (nothing else in the package spells them);
- `card`, `manifest`: the card.json contract and the manifest's schema;
- `writer`: the staging folder `guard prepare` fills and publishes atomically;
- `reader`: the verified reader every consumer opens it with (`open_prepared`), with `noise_check` (the
  statistics of the protected copies), `mapped` (memory-mapped shards) and `relocate` (finding a moved one);
- `torch_dataset`, `hf_dataset`: it as a torch or Hugging Face dataset for a training loop of one's own, after the
  trainer's checks (`sfbd_guard.byo`, docs/byo-trainer.md).
"""
