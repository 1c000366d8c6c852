// Node 20 lacks Promise.withResolvers (Node >= 22), which js-libp2p 3.x's
// dependencies (it-queue) call. Imported first by relay.mjs so it exists
// before any of them loads; a no-op on Node >= 22.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new this((res, rej) => {
      resolve = res
      reject = rej
    })
    return { promise, resolve, reject }
  }
}
