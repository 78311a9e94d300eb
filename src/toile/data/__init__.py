"""Datasets: the procedural scene world, image-caption folders, shards."""
