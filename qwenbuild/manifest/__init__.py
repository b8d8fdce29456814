"""qwen.toml: loading, validation against schemas/qwen.schema.json, presets and resolved model dimensions."""

from qwenbuild.manifest._load import Manifest, ManifestError, Problem, load_manifest, read_toml
from qwenbuild.manifest._presets import MODELS as PRESETS
from qwenbuild.manifest._rules import deployment_dtype, device_limit

__all__ = ["Manifest", "ManifestError", "PRESETS", "Problem", "deployment_dtype", "device_limit", "load_manifest",
           "read_toml"]
