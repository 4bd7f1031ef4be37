"""The web console and the admin API (`/api/v1`) for the people who run the fleet, on their own
HTTPS listener of `iomtca serve` (docs/CONSOLE.md). Every action goes through the same
`Authority` as the other edges; operators, roles and sessions are `ca/operators.py`."""
