"""Reports layer: the offline HTML report of a run."""
