"""A socket parameter server for data-parallel training, written as a Lightning Strategy."""
