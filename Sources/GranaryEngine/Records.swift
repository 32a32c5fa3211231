import GranaryConfiguration
import GranaryMemory

/// The kinds of record the commit protocol sends, named after FaRM's phases.
enum RecordKind: UInt8 {
    /// Coordinator -> primary: lock these objects at these versions; carries the new values.
    case lock = 1
    /// Primary -> coordinator: the outcome of a LOCK.
    case lockReply = 2
    /// Coordinator -> primary: install the locked objects' new values, bump versions, unlock.
    case commitPrimary = 3
    /// Coordinator -> primary: release the locks, change nothing.
    case abort = 4
    /// Coordinator -> backup: the new values, to apply at truncation.
    case commitBackup = 5
    /// Coordinator -> backup: these transactions are done everywhere; apply and drop their records.
    case truncate = 6
    /// Coordinator that leads no region -> primary: reserve a slot (see `RemoteAllocation`).
    case allocate = 7
    /// Primary -> coordinator: the slot reserved, or why there is none.
    case allocateReply = 8
    /// Coordinator -> primary: give back a reserved slot its attempt did not commit.
    case allocateRelease = 9
}

/// What a written object's entry asks for.
enum EntryOperation: UInt8 {
    case write = 1
    case allocate = 2
    case free = 3
}

/// Identifies one transaction attempt cluster-wide and routes the primary's reply:
/// coordinator node (8 bits) | reply slot (16 bits) | sequence (40 bits).
struct TransactionID: Hashable, CustomStringConvertible {
    var rawValue: UInt64

    init(rawValue: UInt64) { self.rawValue = rawValue }
    init(node: NodeID, slot: Int, sequence: UInt64) {
        rawValue = UInt64(node.rawValue) << 56 | UInt64(slot) << 40 | (sequence & 0xFF_FFFF_FFFF)
    }

    var node: NodeID { NodeID(rawValue: UInt16(rawValue >> 56)) }
    var slot: Int { Int((rawValue >> 40) & 0xFFFF) }
    var sequence: UInt64 { rawValue & 0xFF_FFFF_FFFF }
    var description: String { "tx \(node)/\(slot)/\(sequence)" }
}

/// Record wire format (little-endian, 8-byte aligned):
/// ```
/// header  0 kind u8 | 1 cause u8 | 2 count u16 | 4 magic u16 "GR" | 6 flags u16
///         8 configuration id u64 | 16 transaction id u64
/// entry   0 address u64 | 8 expected header u64 | 16 new header u64
///         24 length u32 | 28 lines u16 | 30 operation u8 | 31 flags u8 | 32 payload, padded to 8
/// trailer (flag bit 0, LOCK and COMMIT-BACKUP): after the entries, the transaction's backups
///         u64, a bit per node, in the record's configuration
/// truncate: header, then `count` transaction ids (u64)
/// ```
///
/// The trailer stands for FaRM's region list in LOCK and COMMIT-BACKUP records: recovery must know
/// every backup the whole transaction wrote, or it may commit the regions the survivors' records name
/// and lose one whose records died with its coordinator
/// (``TransactionRecovery/decide(votes:in:survivors:)``).
///
/// A COMMIT-BACKUP carries the whole write set: the entries of the regions its receiver backs, and
/// the others with entry flag bit 0 (``RecordFormat/replicatedEntry``), which the receiver keeps
/// but never applies. They are REPLICATE-TX-STATE's material: when a coordinator and every primary
/// it wrote fail together, a surviving backup's record is all that is left of the transaction, and
/// recovery ships it to the replicas that hold no record (``TransactionRecovery/replicated(_:)``).
enum RecordFormat {
    static let magic: UInt16 = 0x5247
    static let headerBytes = 24
    /// The trailer of LOCK and COMMIT-BACKUP records: the transaction's backups.
    static let trailerBytes = 8
    /// Flag bit: the record ends with the trailer.
    static let hasTrailer: UInt16 = 1
    /// Entry flag bit: a COMMIT-BACKUP entry of a region its receiver does not back (kept for
    /// recovery, never applied at TRUNCATE).
    static let replicatedEntry: UInt8 = 1
    static let entryHeaderBytes = 32
    /// A COMMIT-PRIMARY's cause byte when the transaction has no backups: the primary keeps its
    /// LOCK and COMMIT-PRIMARY records in the log until TRUNCATE (the only proof of the commit).
    /// Otherwise the backups' COMMIT-BACKUP records are that proof and the primary releases its
    /// records once it has installed.
    static let keepUntilTruncate: UInt8 = 1
    /// The most entries (or transaction ids) one record holds: its count is 16 bits.
    static let maximumEntries = Int(UInt16.max)

    static func padded(_ n: Int) -> Int { (n + 7) & ~7 }
    static func entryBytes(payload: Int) -> Int { entryHeaderBytes + padded(payload) }
}

/// Writes one record into a caller-owned buffer.
struct RecordWriter {
    let base: UnsafeMutableRawPointer
    let capacity: Int
    private(set) var count: Int = RecordFormat.headerBytes
    private var entries: UInt16 = 0

    init(into base: UnsafeMutableRawPointer, capacity: Int, kind: RecordKind, configuration: ConfigurationID,
         transaction: TransactionID, cause: UInt8 = 0) {
        self.base = base
        self.capacity = capacity
        base.storeBytes(of: kind.rawValue, toByteOffset: 0, as: UInt8.self)
        base.storeBytes(of: cause, toByteOffset: 1, as: UInt8.self)
        base.storeBytes(of: UInt16(0), toByteOffset: 2, as: UInt16.self)
        base.storeBytes(of: RecordFormat.magic, toByteOffset: 4, as: UInt16.self)
        base.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
        base.storeBytes(of: configuration.rawValue, toByteOffset: 8, as: UInt64.self)
        base.storeBytes(of: transaction.rawValue, toByteOffset: 16, as: UInt64.self)
    }

    /// Whether an entry with `payload` bytes still fits.
    func fits(payload: Int) -> Bool { count + RecordFormat.entryBytes(payload: payload) <= capacity }

    mutating func appendEntry(address: GlobalAddress, expected: ObjectHeader, new: ObjectHeader, lines: Int,
                              operation: EntryOperation, payload: UnsafeRawPointer?, length: Int, flags: UInt8 = 0) {
        precondition(fits(payload: length))
        let entry = base + count
        entry.storeBytes(of: address.rawValue, toByteOffset: 0, as: UInt64.self)
        entry.storeBytes(of: expected.rawValue, toByteOffset: 8, as: UInt64.self)
        entry.storeBytes(of: new.rawValue, toByteOffset: 16, as: UInt64.self)
        entry.storeBytes(of: UInt32(length), toByteOffset: 24, as: UInt32.self)
        entry.storeBytes(of: UInt16(lines), toByteOffset: 28, as: UInt16.self)
        entry.storeBytes(of: operation.rawValue, toByteOffset: 30, as: UInt8.self)
        entry.storeBytes(of: flags, toByteOffset: 31, as: UInt8.self)
        if length > 0, let payload { (entry + 32).copyMemory(from: payload, byteCount: length) }
        let padding = RecordFormat.padded(length) - length
        if padding > 0 { (entry + 32 + length).initializeMemory(as: UInt8.self, repeating: 0, count: padding) }
        count += RecordFormat.entryBytes(payload: length)
        entries += 1
        base.storeBytes(of: entries, toByteOffset: 2, as: UInt16.self)
    }

    /// Ends a LOCK or COMMIT-BACKUP record with the transaction's backups (a bit per node):
    /// after the last entry.
    mutating func appendTrailer(backups: UInt64) {
        precondition(count + RecordFormat.trailerBytes <= capacity)
        base.storeBytes(of: backups, toByteOffset: count, as: UInt64.self)
        count += RecordFormat.trailerBytes
        base.storeBytes(of: RecordFormat.hasTrailer, toByteOffset: 6, as: UInt16.self)
    }

    /// Appends a raw word to the record's body (for records without entries: no count change).
    mutating func appendWord(_ word: UInt64) {
        precondition(count + 8 <= capacity)
        base.storeBytes(of: word, toByteOffset: count, as: UInt64.self)
        count += 8
    }

    mutating func appendTransaction(_ id: TransactionID) {
        precondition(count + 8 <= capacity)
        base.storeBytes(of: id.rawValue, toByteOffset: count, as: UInt64.self)
        count += 8
        entries += 1
        base.storeBytes(of: entries, toByteOffset: 2, as: UInt16.self)
    }

    var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: count) }
}

/// A record received from a channel, checked for shape before any field is trusted.
struct RecordView {
    let kind: RecordKind
    let cause: UInt8
    let count: Int
    let configuration: ConfigurationID
    let transaction: TransactionID
    /// The entries (or transaction ids), without the trailer.
    let body: UnsafeRawBufferPointer
    /// The transaction's backups (a bit per node), for a record with the trailer.
    let backups: UInt64?

    struct Malformed: Error, CustomStringConvertible {
        let description: String
    }

    init(_ bytes: UnsafeRawBufferPointer) throws(Malformed) {
        guard bytes.count >= RecordFormat.headerBytes else {
            throw Malformed(description: "a \(bytes.count)-byte message is shorter than a record header")
        }
        guard bytes.loadUnaligned(fromByteOffset: 4, as: UInt16.self) == RecordFormat.magic else {
            throw Malformed(description: "the message is not a Granary record (bad magic)")
        }
        guard let kind = RecordKind(rawValue: bytes.load(fromByteOffset: 0, as: UInt8.self)) else {
            throw Malformed(description: "unknown record kind \(bytes.load(fromByteOffset: 0, as: UInt8.self))")
        }
        self.kind = kind
        self.cause = bytes.load(fromByteOffset: 1, as: UInt8.self)
        self.count = Int(bytes.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        self.configuration = ConfigurationID(rawValue: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        self.transaction = TransactionID(rawValue: bytes.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        if bytes.loadUnaligned(fromByteOffset: 6, as: UInt16.self) & RecordFormat.hasTrailer != 0 {
            guard bytes.count >= RecordFormat.headerBytes + RecordFormat.trailerBytes else {
                throw Malformed(description: "a \(bytes.count)-byte \(kind) record is too short for the trailer it announces")
            }
            let end = bytes.count - RecordFormat.trailerBytes
            self.backups = bytes.loadUnaligned(fromByteOffset: end, as: UInt64.self)
            self.body = UnsafeRawBufferPointer(rebasing: bytes[RecordFormat.headerBytes..<end])
        } else {
            self.backups = nil
            self.body = UnsafeRawBufferPointer(rebasing: bytes[RecordFormat.headerBytes...])
        }
    }

    struct Entry {
        let address: GlobalAddress
        let expected: ObjectHeader
        let new: ObjectHeader
        let lines: Int
        let operation: EntryOperation
        let payload: UnsafeRawBufferPointer
        /// A COMMIT-BACKUP entry of a region the receiver does not back (``RecordFormat/replicatedEntry``).
        let replicated: Bool
    }

    /// Calls `body` with each entry, checking every length against the record's size.
    @inline(__always)
    func forEachEntry(_ handle: (Entry) throws -> Void) throws {
        var offset = 0
        for index in 0..<count {
            guard offset + RecordFormat.entryHeaderBytes <= body.count else {
                throw Malformed(description: "entry \(index) of \(count) runs past the end of the record")
            }
            let length = Int(body.loadUnaligned(fromByteOffset: offset + 24, as: UInt32.self))
            guard offset + RecordFormat.entryBytes(payload: length) <= body.count,
                  let operation = EntryOperation(rawValue: body.load(fromByteOffset: offset + 30, as: UInt8.self)) else {
                throw Malformed(description: "entry \(index) has a bad length or operation")
            }
            try handle(Entry(
                address: GlobalAddress(rawValue: body.loadUnaligned(fromByteOffset: offset, as: UInt64.self)),
                expected: ObjectHeader(rawValue: body.loadUnaligned(fromByteOffset: offset + 8, as: UInt64.self)),
                new: ObjectHeader(rawValue: body.loadUnaligned(fromByteOffset: offset + 16, as: UInt64.self)),
                lines: Int(body.loadUnaligned(fromByteOffset: offset + 28, as: UInt16.self)),
                operation: operation,
                payload: UnsafeRawBufferPointer(rebasing: body[(offset + 32)..<(offset + 32 + length)]),
                replicated: body.load(fromByteOffset: offset + 31, as: UInt8.self) & RecordFormat.replicatedEntry != 0))
            offset += RecordFormat.entryBytes(payload: length)
        }
    }

    /// Calls `body` with each transaction id of a TRUNCATE record.
    @inline(__always)
    func forEachTransactionID(_ handle: (TransactionID) throws -> Void) throws {
        guard count * 8 <= body.count else { throw Malformed(description: "a truncate record lists more ids than it holds") }
        for index in 0..<count { try handle(TransactionID(rawValue: body.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))) }
    }
}
