"""DeepSeek-V4 in Flax NNX: `build(config, rngs=...)`, `abstract(config)`, presets, counts,
`load_pretrained(path)` (DeepSeek's released checkpoints)."""
from .config import PRESETS, ConfigError, ModelConfig, preset
from .counts import flops_per_token, kv_cache_bytes_per_token, param_counts
from .pretrained import load_pretrained
from .transformer import Model, ModelAux, abstract, build, plan_segments

__all__ = ["PRESETS", "ConfigError", "ModelConfig", "preset", "flops_per_token",
           "kv_cache_bytes_per_token", "param_counts", "Model", "ModelAux", "abstract", "build",
           "plan_segments", "load_pretrained"]
