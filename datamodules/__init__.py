"""LightningDataModules for the paper's datasets, read in their published layouts."""

from typing import Any

__all__ = ["VideoFolderDataModule"]


def __getattr__(name: str) -> Any:
    """``datamodules.VideoFolderDataModule`` (imported on first use, so that importing
    one data module does not import the others)."""
    if name == "VideoFolderDataModule":
        from datamodules.video_folder import VideoFolderDataModule

        return VideoFolderDataModule
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
