"""The cnisup benchmark: primary vs fallback workers, side by side, in one run."""
