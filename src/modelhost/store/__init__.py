"""The verified, content-addressed model cache."""

from modelhost.store.manifest import Manifest, ManifestFile
from modelhost.store.store import CommitFile, Store, describe, safe_relative_path

__all__ = ["CommitFile", "Manifest", "ManifestFile", "Store", "describe", "safe_relative_path"]
