"""Shared test support: speech synthesis, test vocabularies, and the official-code reference helpers."""
