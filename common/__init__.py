"""What the CA, the EST server and the gateway share that holds no CA secret and no CA logic:
error codes, key files (encrypted, 0600, atomic writes, locks), key generation, and the renewal
arithmetic of service certificates. The gateway imports from here, never from `ca.keystore`,
`ca.signer`, `ca.authority` or `ca.store`."""
