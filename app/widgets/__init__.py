"""Reusable dashboard widgets; each renders from a RunState and stays cheap to refresh."""
