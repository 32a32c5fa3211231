import GranaryConfiguration
import GranaryMemory
import GranaryTransport

/// Allocation at a region's primary for a coordinator that leads no region (a client member, as
/// FORD's compute nodes): FaRM's allocator runs at the primary, so a coordinator that is primary
/// of no region asks one.
///
/// 1. **ALLOCATE** (coordinator -> primary, on the primary's log; released at once): a region and
///    a payload size. The primary's CPU reserves a slot in its allocator, as a local allocation
///    does, and notes who holds the reservation.
/// 2. **ALLOCATE-REPLY** (primary -> coordinator, on the coordinator's message queue): the slot's
///    address (with its incarnation), its header and size, or why there is none (region full,
///    object too large, not the primary). The coordinator then writes the new object as a local
///    allocation does: an `allocate` entry in its LOCK to that primary, whose install enters the
///    slot as allocated (and ends the reservation).
/// 3. **ALLOCATE-RELEASE** (coordinator -> primary, on the log): the attempt aborted, or freed
///    the object it allocated: the primary returns the slot to its allocator, if that coordinator
///    holds the reservation.
///
/// A reservation whose coordinator crashes, or gives up waiting for the reply, stays reserved
/// until the primary's allocator is rebuilt from the region (a restart or a promotion): slots can
/// be lost that way, never handed out twice.
///
/// Wire format, after the record header (the transaction id is the coordinator's reply slot):
/// ```
/// ALLOCATE          0 region u32 | 4 payload bytes u32
/// ALLOCATE-REPLY    cause: AllocationStatus; 0 address u64 | 8 header u64 | 16 lines u32 | 20 region u32
/// ALLOCATE-RELEASE  0 address u64 | 8 lines u32 | 12 zero u32
/// ```
enum RemoteAllocation {
    static let requestBytes = RecordFormat.headerBytes + 8
    static let replyBytes = RecordFormat.headerBytes + 24
    static let releaseBytes = RecordFormat.headerBytes + 16

    /// An ALLOCATE-REPLY's cause byte.
    enum Status: UInt8 {
        case reserved = 0
        case regionFull = 1
        case tooLarge = 2
        case notPrimary = 3
    }
}

/// Who holds a slot a primary reserved for a remote coordinator, and in which allocator: a
/// release is honoured only from that node, and only while that allocator is the region's (a
/// promotion or restart rebuilds the allocator from the region, which returns unused
/// reservations by itself).
struct RemoteReservationHolder {
    let node: NodeID
    /// The allocator's ``SlabAllocator/generation``.
    let allocator: UInt64
}

/// A slot a primary reserved for this coordinator: returned with ALLOCATE-RELEASE if the attempt
/// does not commit it.
struct RemoteReservation {
    let address: GlobalAddress
    let lines: Int
    let primary: NodeID
}

extension Transaction {
    /// Allocates at the primary of another node's region (this node leads none): ALLOCATE, then
    /// the reply. Regions are tried in turn from a rotating start; a full one is skipped.
    func allocateRemotely(raw bytes: UnsafeRawBufferPointer) throws -> GlobalAddress {
        let candidates = withView { view in
            view.configuration.regions.filter { $0.primary != view.node && view.isMember($0.primary) }
        }
        guard !candidates.isEmpty else {
            throw TransactionError.outOfMemory(bytes: bytes.count, reason: "no region has a primary that could allocate for \(engine.node)")
        }
        let start = engine.allocationCursor.wrappingAdd(1, ordering: .relaxed).oldValue
        var full: [String] = []
        for step in 0..<candidates.count {
            let placement = candidates[(start &+ step) % candidates.count]
            guard let (address, header, lines) = try requestSlot(in: placement.region, at: placement.primary, payloadBytes: bytes.count)
            else {
                full.append(placement.region.description)
                continue
            }
            remoteReservations.append(RemoteReservation(address: address, lines: lines, primary: placement.primary))
            writeIndex.append(address)
            writes.append(WriteEntry(address: address, primary: placement.primary, expected: header, new: header.allocating,
                                     operation: .allocate, lines: lines, payloadOffset: payloads.count, length: bytes.count))
            payloads.append(contentsOf: bytes)
            return address
        }
        throw TransactionError.outOfMemory(bytes: bytes.count, reason: "every region's primary answered full (\(full.joined(separator: ", ")))")
    }

    /// ALLOCATE to `primary` for `region` and the wait for its answer: the slot, or nil when the
    /// region is full.
    private func requestSlot(in region: RegionID, at primary: NodeID, payloadBytes: Int) throws -> (GlobalAddress, ObjectHeader, Int)? {
        let engine = self.engine
        let id = engine.replies.acquireWaiting(node: engine.node, replies: 1)
        defer { engine.replies.release(id) }
        var writer = RecordWriter(into: recordBuffer, capacity: RemoteAllocation.requestBytes, kind: .allocate,
                                  configuration: withView { $0.configurationID }, transaction: id)
        writer.appendWord(UInt64(region.rawValue) | UInt64(UInt32(clamping: payloadBytes)) << 32)
        try sendRecord(writer.bytes, to: primary)
        let neighbour = unmanagedNeighbours[primary.index]
        let answer = engine.replies.wait(id, timeoutNanoseconds: engine.replyTimeoutNanoseconds) {
            if engine.gate.removing.load(ordering: .relaxed) & (1 << UInt64(primary.index)) != 0 || engine.gate.isRecovering
                || !engine.running.load(ordering: .relaxed) {
                engine.replies.abandon(id, failure: AbortCause.wrongConfiguration.rawValue)
            }
            return engine.helpPoll(for: engine.node) + (neighbour?._withUnsafeGuaranteedRef { $0.helpPoll(for: engine.node) } ?? 0)
        }
        guard let status = answer else {
            guard engine.running.load(ordering: .relaxed) else { throw TransactionError.shutDown(engine.node) }
            throw TransactionError.peerUnresponsive(primary, waitedMilliseconds: Int(engine.replyTimeoutNanoseconds / 1_000_000))
        }
        // (A wait abandoned for a recovery reports wrong-configuration, which is no status.)
        if status == AbortCause.wrongConfiguration.rawValue { throw AbortSignal(cause: .wrongConfiguration) }
        let (address, header, lines, answeredRegion) = engine.replies.allocation(id)
        switch RemoteAllocation.Status(rawValue: status) {
        case .reserved:
            guard answeredRegion == region, address.region == region, lines >= 1 else {
                // Whatever the primary reserved goes back to it (it honours the release only if
                // this node holds that reservation), rather than staying reserved.
                if lines >= 1 { releaseRemote(RemoteReservation(address: address, lines: lines, primary: primary)) }
                throw TransactionError.rejectedByPrimary([GlobalAddress(region: region, offset: 0)],
                                                         reason: "\(primary) answered an allocation in \(region) with \(address) of \(lines) lines")
            }
            return (address, header, lines)
        case .regionFull: return nil
        case .tooLarge: throw TransactionError.tooLarge(bytes: payloadBytes, maximum: lines)
        case .notPrimary, nil: throw AbortSignal(cause: .wrongConfiguration)
        }
    }

    /// Gives back the slots primaries reserved for this attempt (it aborted, or will not commit
    /// them): ALLOCATE-RELEASE to each. A release that cannot be sent leaves the slot reserved
    /// until the primary's allocator is rebuilt.
    func returnRemoteReservations() {
        guard !remoteReservations.isEmpty else { return }
        for reservation in remoteReservations { releaseRemote(reservation) }
        remoteReservations.removeAll(keepingCapacity: true)
    }

    /// ALLOCATE-RELEASE of one reservation.
    func releaseRemote(_ reservation: RemoteReservation) {
        var writer = RecordWriter(into: recordBuffer, capacity: RemoteAllocation.releaseBytes, kind: .allocateRelease,
                                  configuration: withView { $0.configurationID }, transaction: TransactionID(node: engine.node, slot: 0, sequence: 0))
        writer.appendWord(reservation.address.rawValue)
        writer.appendWord(UInt64(reservation.lines))
        do {
            try sendRecord(writer.bytes, to: reservation.primary, usingReserve: true)
        } catch {
            engine.logger.warning("could not return the slot \(reservation.address) reserved at \(reservation.primary): \(error); it stays reserved until that node's allocator is rebuilt")
        }
    }
}

extension RecordProcessor {
    /// ALLOCATE at the primary's CPU: reserves a slot and answers with it.
    func allocateForRemote(_ record: RecordView, from sender: NodeID, view: ConfigurationView) throws {
        guard record.body.count >= 8 else { throw RecordView.Malformed(description: "an ALLOCATE record of \(record.body.count) body bytes") }
        let word = record.body.loadUnaligned(fromByteOffset: 0, as: UInt64.self)
        let region = RegionID(rawValue: UInt32(truncatingIfNeeded: word))
        let payloadBytes = Int(word >> 32)
        guard let replica = view.localReplica(region), let allocator = replica.allocator else {
            answerAllocation(to: record.transaction, status: .notPrimary, region: region, view: view)
            return
        }
        let slot: ObjectSlot
        do throws(AllocationError) {
            slot = try allocator.reserve(payloadBytes: payloadBytes)
        } catch {
            if case .objectTooLarge(_, let maximum) = error {
                answerAllocation(to: record.transaction, status: .tooLarge, lines: maximum, region: region, view: view)
            } else {
                answerAllocation(to: record.transaction, status: .regionFull, region: region, view: view)
            }
            return
        }
        let header = ObjectLayout.loadHeader(replica.region.base + slot.offset).unlocked
        let address = GlobalAddress(region: region, offset: UInt32(slot.offset), incarnation: header.incarnation)
        remoteReservations[address.untagged.rawValue] = RemoteReservationHolder(node: sender, allocator: allocator.generation)
        answerAllocation(to: record.transaction, status: .reserved, address: address, header: header, lines: slot.lines,
                         region: region, view: view)
    }

    /// ALLOCATE-RELEASE at the primary's CPU: the slot goes back to the allocator if `sender`
    /// holds its reservation (anything else is refused: a foreign or replayed release must not
    /// free a slot that is reserved for another, or allocated).
    func releaseForRemote(_ record: RecordView, from sender: NodeID, view: ConfigurationView) throws {
        guard record.body.count >= 16 else { throw RecordView.Malformed(description: "an ALLOCATE-RELEASE record of \(record.body.count) body bytes") }
        let address = GlobalAddress(rawValue: record.body.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let lines = Int(record.body.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        guard let holder = remoteReservations[address.untagged.rawValue], holder.node == sender else {
            throw RecordView.Malformed(description: "a release of \(address), which \(sender) has not reserved")
        }
        guard let allocator = view.localReplica(address.region)?.allocator, holder.allocator == allocator.generation else {
            // Reserved in an allocator since rebuilt from the region (this node was demoted and
            // promoted again, or restarted): the rebuilt one never handed that slot out.
            remoteReservations[address.untagged.rawValue] = nil
            throw RecordView.Malformed(description: "a release of \(address), reserved in an allocator of \(address.region) that has since been rebuilt")
        }
        guard (try? allocator.slot(at: Int(address.offset)))?.lines == lines else {
            throw RecordView.Malformed(description: "a release of \(address) with \(lines) lines, which is not such a slot here")
        }
        remoteReservations[address.untagged.rawValue] = nil
        allocator.unreserve(ObjectSlot(offset: Int(address.offset), lines: lines))
    }

    /// An allocate entry of a LOCK was installed: the slot it used is no longer reserved.
    @inline(__always) func endRemoteReservation(_ address: GlobalAddress) {
        if !remoteReservations.isEmpty { remoteReservations[address.untagged.rawValue] = nil }
    }
}
