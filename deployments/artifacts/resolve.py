"""Turn a tier's `Artifact` into what its engine loads: a directory, a file, or a hub id."""

from __future__ import annotations

from pathlib import Path

from deployments.spec import Artifact, TierSpec


def resolve_artifact(artifact: Artifact) -> Path | str:
    if artifact.kind == "path":
        assert artifact.path is not None
        return artifact.path
    if artifact.kind == "huggingface":
        assert artifact.repo is not None
        # Production nodes pull from the hub (or a mirror) themselves; GGUF tiers name a file.
        return f"{artifact.repo}/{artifact.file}" if artifact.file else artifact.repo
    from deployments.artifacts.tiny_model import ensure_tiny_model

    model_dir = ensure_tiny_model()
    if artifact.quant is None:
        return model_dir
    from deployments.artifacts.gguf import ensure_tiny_gguf

    return ensure_tiny_gguf(artifact.quant)


def resolve_mmproj(spec: TierSpec) -> Path | None:
    """A GGUF tier's vision projector, where the tier takes images."""
    if not spec.capabilities.vision:
        return None
    if spec.artifact.kind != "embedded":
        return spec.artifact.mmproj
    from deployments.artifacts.gguf import ensure_tiny_mmproj

    return ensure_tiny_mmproj()
