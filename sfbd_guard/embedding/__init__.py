"""Image embeddings and exact nearest-neighbour search, shared by curation (near-duplicates) and the audit.

- `embed`: the embedder protocol, the weight-free pixel embedder, batching;
- `clip`: open_clip embeddings from local weights only;
- `ray_embed`: the same embedding spread over a Ray cluster;
- `knn`: exact k-NN over reference shards, one shard in memory at a time.
"""
