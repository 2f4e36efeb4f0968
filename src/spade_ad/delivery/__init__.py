"""Delivery: the command line, the HTML report and the web inspector, apart from the core."""
