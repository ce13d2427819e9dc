"""The domain: specs, the memory and time models, the search and the plan."""
