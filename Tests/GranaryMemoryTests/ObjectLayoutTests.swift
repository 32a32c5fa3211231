import Testing
import GranaryTestSupport
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
}
