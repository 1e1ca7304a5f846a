"""caikit's bundled feedback plugins: the constitutional critic (and labellers)."""
