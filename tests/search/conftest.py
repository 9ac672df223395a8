"""Shared fixtures: small synthetic profiles written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa_search.search.synthetic import make_synthetic_profile, synthetic_identity


@pytest.fixture(scope="session")
def small_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers x 2 KV heads, 40 candidates, lengths 1024/2048."""
    root = tmp_path_factory.mktemp("profile")
    return make_synthetic_profile(
        root / "p", synthetic_identity(4, 2, 2, 64), lengths=(1024, 2048), seed=1
    )


@pytest.fixture
def profile_copy(small_profile: Path, tmp_path: Path) -> Path:
    """A private copy, so a test may write its default plans/ folder next to it."""
    import shutil

    dest = tmp_path / "profile"
    shutil.copytree(small_profile, dest)
    return dest
