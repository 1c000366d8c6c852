// A stock js-libp2p circuit relay v2 server, as an operator would run one:
// TCP + Noise + yamux, identify and ping, the relay server with its default
// limits (2 minutes and 128 KiB per relayed connection). Used by
// tests/test_limited_relay.py to show what peerup does through a limited relay.
//
//   node relay.mjs [PORT] [HOST]   -> prints "listening /ip4/HOST/tcp/PORT/p2p/<id>"
import './polyfill.mjs'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { circuitRelayServer } from '@libp2p/circuit-relay-v2'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { createLibp2p } from 'libp2p'

const port = process.argv[2] ?? '0'
const host = process.argv[3] ?? '127.0.0.1'

const node = await createLibp2p({
  addresses: { listen: [`/ip4/${host}/tcp/${port}`] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    relay: circuitRelayServer()
  }
})

for (const addr of node.getMultiaddrs()) {
  console.log(`listening ${addr.toString()}`)
}

const stop = async () => {
  await node.stop()
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
