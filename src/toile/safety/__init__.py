"""Prompt policy, output checks, provenance and image metadata."""
