"""The llmctl CLI and everything it orchestrates: charts, releases, builds, drivers."""
