"""The seed's design written plainly, to measure the service against."""
