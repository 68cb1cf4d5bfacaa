"""The suite's model size. The suite is compile-bound, and compile time grows with the number
of distinct layer bodies: `tiny` (6 layers: window+hash, CSA+hash, then (HCA, CSA) x 2 scanned)
compiles its gradient in ~18 s on one CPU core, SMALL in ~12 s. SMALL keeps every kind of
parameter and path a training or sharding test needs: a sliding-window hash-routed layer, then
two score-routed CSA layers (compressor, lightning indexer) stacked in one scanned segment, and
the MTP block. HCA's own numerics are covered by tests/test_model.py and the HF parity tests on
the full `tiny`. The CSA segment runs as a loop (scan_unroll=1, what the pods run; configs/tiny.yaml
unrolls it, which compiles this gradient ~20% slower)."""
SMALL = dict(n_layers=3, compress_ratios=(0, 4, 4), n_hash_layers=1)
SMALL_OVERRIDES = ["model.n_layers=3", "model.compress_ratios=[0,4,4]", "model.n_hash_layers=1",
                   "model.scan_unroll=1"]
