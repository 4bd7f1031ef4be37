"""`iomtca init`."""
from __future__ import annotations

from ca.bootstrap import init_ca


async def run(args) -> int:
    result = await init_ca(args.dir, trust_domain=args.trust_domain, key_type=args.key_type,
                           extra_server_names=tuple(args.server_name), base_url=args.base_url, force=args.force)
    p = result.paths
    if result.replaced:
        print(f"moved the previous CA directory to {result.replaced}")
    print(f"initialised CA in {p.home} (trust domain {args.trust_domain}, {args.key_type})")
    print(f"  trust anchor (root CA):  {p.root_cert}")
    print(f"  chain (issuing + root):  {p.chain}")
    print(f"  OCSP responder:          {p.ocsp_cert}")
    print(f"  enrollment server cert:  {p.server_cert}")
    print(f"  config:                  {p.config}")
    if result.passphrase_file:
        print(f"  key passphrase:          {result.passphrase_file} (mode 0600; for local use only:"
              " in production set IOMTCA_PASSPHRASE from a secret store and delete the file)")
    else:
        print("  key passphrase:          taken from IOMTCA_PASSPHRASE (not written to disk)")
    print("  gateways:                none yet; register one with `iomtca gateway add NAME` and set it up on its"
          " own host with `iomtca gateway init`")
    return 0
