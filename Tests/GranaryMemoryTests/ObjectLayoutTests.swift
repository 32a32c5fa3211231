import Testing
import GranaryTestSupport
#if canImport(Glibc)
import Glibc
#endif
@testable import GranaryMemory

@Suite("Object layout")
struct ObjectLayoutTests {
    @Test("header fields round-trip and transitions bump version and incarnation")
    func headerFields() {
        let h = ObjectHeader(version: 41, incarnation: 3, allocated: true)
        #expect(h.version == 41 && h.incarnation == 3 && h.isAllocated && !h.isLocked)
        #expect(h.locked.isLocked && h.locked.unlocked == h)
        #expect(h.nextVersion.version == 42 && h.nextVersion.incarnation == 3)
        let freed = h.freeing
        #expect(!freed.isAllocated && freed.incarnation == 4 && freed.version == 42)
        #expect(freed.allocating.isAllocated && freed.allocating.incarnation == 4)
        #expect(ObjectHeader(version: 1, incarnation: 0x3FFF, allocated: false).freeing.incarnation == 0, "incarnation wraps in 14 bits")
    }

    @Test("an installed object reads back consistent with its payload, across lines")
    func installAndCheck() {
        let lines = 4
        let object = UnsafeMutableRawPointer.allocate(byteCount: lines * 64, alignment: 64)
        defer { object.deallocate() }
        ObjectLayout.stamp(object, lines: lines, header: ObjectHeader(version: 0, incarnation: 0, allocated: false))
        let payload = (0..<200).map { UInt8($0) }
        let header = ObjectHeader(version: 0, incarnation: 0, allocated: false)
        #expect(ObjectLayout.tryLock(object, expected: header).locked)
        #expect(!ObjectLayout.tryLock(object, expected: header).locked, "a locked object cannot be locked again")
        payload.withUnsafeBytes { ObjectLayout.install(object, lines: lines, payload: $0.baseAddress!, count: 200, header: header.allocating) }
        let snapshot = UnsafeMutableRawPointer.allocate(byteCount: lines * 64, alignment: 64)
        defer { snapshot.deallocate() }
        ObjectLayout.copyLines(from: object, to: snapshot, lines: lines)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: lines) == .consistent(header.allocating))
        var out = [UInt8](repeating: 0, count: 200)
        out.withUnsafeMutableBytes { ObjectLayout.gatherPayload(from: snapshot, into: $0.baseAddress!, count: 200) }
        #expect(out == payload)
    }

    @Test("a snapshot mixing versions is torn, a locked one is locked")
    func tornAndLocked() {
        let lines = 3
        let snapshot = UnsafeMutableRawPointer.allocate(byteCount: lines * 64, alignment: 64)
        defer { snapshot.deallocate() }
        let v1 = ObjectHeader(version: 1, incarnation: 0, allocated: true)
        ObjectLayout.stamp(snapshot, lines: lines, header: v1)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: lines) == .consistent(v1))
        (snapshot + 128).storeBytes(of: v1.nextVersion.rawValue, as: UInt64.self)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: lines) == .torn(line: 2))
        snapshot.storeBytes(of: v1.locked.rawValue, as: UInt64.self)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: lines) == .locked(v1.locked))
    }

    /// An object of `lines` lines and a buffer for a copy of it, both line-aligned.
    static func objectAndSnapshot(lines: Int) -> (UnsafeMutableRawPointer, UnsafeMutableRawPointer) {
        (UnsafeMutableRawPointer.allocate(byteCount: lines * 64, alignment: 64),
         UnsafeMutableRawPointer.allocate(byteCount: lines * 64, alignment: 64))
    }

    @Test("an object copy under its header: quiet objects whole, a line mid-write or a locked header rejected, other lines exact")
    func copyObjectStates() {
        let lines = 4
        let (object, snapshot) = Self.objectAndSnapshot(lines: lines)
        defer { object.deallocate(); snapshot.deallocate() }
        let header = ObjectHeader(version: 5, incarnation: 1, allocated: true)
        ObjectLayout.stamp(object, lines: lines, header: header)
        #expect(ObjectLayout.tryLock(object, expected: header).locked)
        let payload = (0..<(ObjectLayout.payloadCapacity(lines: lines))).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        payload.withUnsafeBytes { ObjectLayout.install(object, lines: lines, payload: $0.baseAddress!, count: payload.count, header: header.nextVersion) }

        // Quiet: the bytes, accepted at the new version; a prefix of the object likewise.
        ObjectLayout.copyObject(from: object, to: snapshot, lines: lines)
        #expect(memcmp(snapshot, object, lines * 64) == 0)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: lines) == .consistent(header.nextVersion))
        ObjectLayout.copyObject(from: object, to: snapshot, lines: 2)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: 2) == .consistent(header.nextVersion))

        // Line 2 in the middle of a write (its word busy) while the header reads unlocked, as a
        // reader can see between a writer's stores: the copy must not be accepted.
        let lineTwo = (object + 128).assumingMemoryBound(to: UInt64.self)
        lineTwo.pointee = header.nextVersion.nextVersion.locked.rawValue
        ObjectLayout.copyObject(from: object, to: snapshot, lines: lines)
        guard case .torn(line: 2) = ObjectLayout.check(snapshot: snapshot, lines: lines) else {
            Issue.record("a copy with line 2 mid-write was \(ObjectLayout.check(snapshot: snapshot, lines: lines))")
            return
        }
        lineTwo.pointee = header.nextVersion.rawValue

        // A locked header: the check says locked.
        #expect(ObjectLayout.tryLock(object, expected: header.nextVersion).locked)
        ObjectLayout.copyObject(from: object, to: snapshot, lines: lines)
        #expect(ObjectLayout.check(snapshot: snapshot, lines: lines) == .locked(header.nextVersion.locked))
        ObjectLayout.unlock(object, restoring: header.nextVersion)

        // Lines that are no one object (first words differ): copied exactly, line by line.
        for line in 0..<lines { (object + line * 64).storeBytes(of: UInt64(line) * 1000 + 1, as: UInt64.self) }
        ObjectLayout.copyObject(from: object, to: snapshot, lines: lines)
        #expect(memcmp(snapshot, object, lines * 64) == 0)
    }

    @Test("an object copy that a whole write overtakes inside its last line is not accepted as the old version")
    func copyObjectOvertaken() {
        // The one tear the object layout cannot see in the copy: every line's first word was copied
        // before a writer installed the next version, but the last line's payload after. Only the
        // second look at the lines' first words catches it.
        let lines = 3
        let (object, snapshot) = Self.objectAndSnapshot(lines: lines)
        defer { object.deallocate(); snapshot.deallocate() }
        let header = ObjectHeader(version: 1, incarnation: 0, allocated: true)
        ObjectLayout.stamp(object, lines: lines, header: header)
        let words = ObjectLayout.payloadCapacity(lines: lines) / 8
        func write(_ value: UInt64, over current: ObjectHeader) {
            let payload = [UInt64](repeating: value, count: words)
            #expect(ObjectLayout.tryLock(object, expected: current).locked)
            payload.withUnsafeBytes { ObjectLayout.install(object, lines: lines, payload: $0.baseAddress!, count: words * 8, header: current.nextVersion) }
        }
        write(0xAAAA, over: header)
        let before = header.nextVersion
        ObjectLayout.copyObject(from: object, to: snapshot, lines: lines) { destination, source, count in
            let split = count - 56  // up to and including the last line's first word
            memcpy(destination, source, split)
            write(0xBBBB, over: before)
            memcpy(destination + split, source + split, count - split)
        }
        switch ObjectLayout.check(snapshot: snapshot, lines: lines) {
        case .consistent(let found):
            var payload = [UInt64](repeating: 0, count: words)
            payload.withUnsafeMutableBytes { ObjectLayout.gatherPayload(from: snapshot, into: $0.baseAddress!, count: words * 8) }
            #expect(Set(payload).count == 1, "accepted at \(found) with payload words \(Set(payload).map { String($0, radix: 16) }) from two writes")
            #expect(found == before.nextVersion, "accepted at \(found), but the copy raced the write to \(before.nextVersion)")
        case let other:
            Issue.record("the copy should have been redone whole at the new version, not \(other)")
        }
    }
}
