"""Command-line tools (icnet-convert, icnet-segment, icnet-bench, icnet-play)."""
