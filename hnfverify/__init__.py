"""hnfverify."""
