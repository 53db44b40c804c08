"""The dashboard's files (HTML, JS, CSS), served at ``GET /`` with no build step."""
