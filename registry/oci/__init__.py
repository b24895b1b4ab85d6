"""Reproducible OCI images assembled from files: layers, images, an OCI layout and the Docker engine.

Small pieces in go-containerregistry's style: `Layer` and `Image` are immutable values keyed by digest;
backends (`layout` for an OCI image layout directory, `daemon` for the local Docker engine) know only
those values. No Dockerfile and no Docker builder: the same inputs always give the same digests.
"""

from registry.oci.image import Healthcheck, Image
from registry.oci.layer import Entry, Layer, source_date_epoch

__all__ = ["Entry", "Healthcheck", "Image", "Layer", "source_date_epoch"]
