"""Feature extractors, FID / KID / precision-recall and timing."""
