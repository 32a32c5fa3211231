import GranaryConfiguration
import GranaryMemory
import GranaryTransport

/// Why a transaction attempt aborted (a conflict, retried automatically up to the attempt limit).
public enum AbortCause: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// LOCK found an object locked by another transaction or at another version than read.
    case lockConflict = 1
    /// VALIDATE found an object read (not written) changed or locked.
    case validationFailed = 2
    /// An execute-phase read kept finding the object locked by a committing transaction.
    case readLocked = 3
    /// Two reads of one object in the transaction saw different versions.
    case inconsistentRead = 4
    /// A record was rejected because it carried another configuration's id.
    case wrongConfiguration = 5
    /// The primary could not take the lock: the address is not an object it holds.
    case invalidObject = 6
    /// A primary's log had no room for the LOCK (records kept until TRUNCATE filled it) and the
    /// caller can wait without a thread (`Node.transaction`): the attempt ends and is retried
    /// after a pause, instead of holding a thread of the cooperative pool that the transactions
    /// whose records fill the log may need to finish.
    case logFull = 7

    /// The cause's name in metrics and logs (`lock-conflict`, `validation-failed`, ...): the
    /// `cause` dimension of `granary_transactions_aborted_total`.
    public var description: String {
        switch self {
        case .lockConflict: return "lock-conflict"
        case .validationFailed: return "validation-failed"
        case .readLocked: return "read-locked"
        case .inconsistentRead: return "inconsistent-read"
        case .wrongConfiguration: return "wrong-configuration"
        case .invalidObject: return "invalid-object"
        case .logFull: return "log-full"
        }
    }
}

/// Why a transaction did not commit.
public enum TransactionError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Every attempt aborted on a conflict; the last cause is given.
    case conflict(AbortCause, attempts: Int)
    /// The address is not in any region of the configuration, or not an object's start.
    case invalidAddress(GlobalAddress, reason: String)
    /// The object was freed (or never allocated).
    case notAllocated(GlobalAddress)
    /// The value does not fit one object.
    case tooLarge(bytes: Int, maximum: Int)
    /// No region with a local primary has room for a new object of this size.
    case outOfMemory(bytes: Int, reason: String)
    /// A peer did not answer in time.
    case peerUnresponsive(NodeID, waitedMilliseconds: Int)
    /// A primary refused to lock written objects: an address that is not an object there, or a value
    /// larger than the object's slot.
    case rejectedByPrimary([GlobalAddress], reason: String)
    /// The transport failed.
    case transport(TransportError)
    /// The node is shut down.
    case shutDown(NodeID)
    /// The commit failed at a point where the coordinator cannot know whether the transaction
    /// committed (a send failed after COMMIT-BACKUP began and the ABORT that would undo it could not
    /// be delivered everywhere, or no COMMIT-PRIMARY could be delivered). The logs decide: recovery
    /// commits it on every replica or on none. Never reported for a transaction that certainly
    /// did not commit, nor for one that certainly did.
    case outcomeUnknown(reason: String)

    /// The error in a sentence, with the addresses, nodes and sizes it concerns.
    public var description: String {
        switch self {
        case .conflict(let cause, let attempts):
            return "the transaction aborted on every one of \(attempts) attempts (last cause: \(cause))"
        case .invalidAddress(let address, let reason):
            return "\(address) is not a valid object address: \(reason)"
        case .notAllocated(let address):
            return "the object at \(address) is not allocated (freed, or never allocated)"
        case .tooLarge(let bytes, let maximum):
            return "a value of \(bytes) bytes exceeds the largest object (\(maximum) bytes)"
        case .outOfMemory(let bytes, let reason):
            return "cannot allocate \(bytes) bytes: \(reason)"
        case .peerUnresponsive(let node, let waited):
            return "node \(node) did not answer within \(waited) ms"
        case .rejectedByPrimary(let addresses, let reason):
            return "the primary refused the write of \(addresses.map(\.description).joined(separator: ", ")): \(reason)"
        case .transport(let error):
            return "transport failure: \(error)"
        case .shutDown(let node):
            return "node \(node) is shut down"
        case .outcomeUnknown(let reason):
            return "the transaction may or may not have committed (recovery from the logs decides): \(reason)"
        }
    }
}

/// Thrown inside a transaction body when the attempt must abort; the engine catches it and retries.
struct AbortSignal: Error {
    let cause: AbortCause
}
