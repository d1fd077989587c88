"""Data: sources (TFDS, image folders, the digits, the 2-D toy), the seeded resumable
stream, preprocessing; `pipeline` puts them together."""
