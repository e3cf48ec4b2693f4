"""State bundles: one state's data directory with the chain that names it, for CI caches."""

from taidon_proxy.store.bundle.content import read_manifest, verify
from taidon_proxy.store.bundle.manifest import BundleError, Manifest
from taidon_proxy.store.bundle.transfer import (
    ExportSource,
    ImportResult,
    import_bundle,
    prepare_export,
)

__all__ = [
    "BundleError",
    "ExportSource",
    "ImportResult",
    "Manifest",
    "import_bundle",
    "prepare_export",
    "read_manifest",
    "verify",
]
