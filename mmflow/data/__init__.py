"""Data formats and data-parallel helpers shared by the stages."""
