import Granary

/// A loader's transaction, run again whenever its coordinator could not learn its outcome
/// (`TransactionError.outcomeUnknown`: a send failed, its lease from the configuration manager
/// lapsed while it committed and a recovery began before the next grant, or a node failed under
/// it). Its body must allow that: it inserts keys that a committed earlier run would have
/// inserted and returns the same result either way, or it allocates objects that no one uses if
/// an earlier run committed.
///
/// Running it again is how a client learns the outcome: if the first run committed, the second
/// finds every key present and changes nothing; if it did not, the second inserts them. (The
/// second run waits behind the first's locks while recovery decides it.) A load that meets an
/// unknown outcome `attempts` times in a row fails with the last one.
package func loadTransaction<R: Sendable>(on node: Node, attempts: Int = 8,
                                          _ body: (Transaction) throws -> R) async throws -> R {
    var unknown = 0
    while true {
        do {
            return try await node.transaction(body)
        } catch TransactionError.outcomeUnknown(let reason) {
            unknown += 1
            guard unknown < attempts else { throw TransactionError.outcomeUnknown(reason: reason) }
        }
    }
}
